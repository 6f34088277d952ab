"""Which modules a ``target_modules`` entry selects, in time bounded by the name and the pattern.

Targets come from adapter files that users download, so matching them must never hang:

* A **plain dotted name** (``ups``, ``convs1.0``: letters, digits, ``_`` and dots) selects a
  module whose qualified name holds its components as a contiguous run (``"ups"`` matches
  ``dec.ups.0``).
* **Anything else is a regular expression** that must match the whole qualified name (as
  ``re.fullmatch``), run by a linear-time engine here rather than by Python's backtracking
  ``re``: the pattern is parsed by Python's own parser, turned into a Thompson NFA and
  simulated over the name one character at a time (the state sets are cached, as a lazily
  built DFA). A name of ``n`` characters costs at most ``n × states`` steps, whatever the
  pattern, so ``(([\\w.]+)+)+Z`` is as cheap as ``ups``. What such an engine cannot do is
  refused when the config is read: backreferences, lookahead/lookbehind, conditionals,
  atomic groups and possessive repeats, and the flags that change what a character matches
  (``(?i)``, ``(?a)``, ``(?L)``, ``(?m)``).

Caps (:data:`MAX_TARGETS`, :data:`MAX_TARGET_CHARS`, :data:`MAX_TOTAL_CHARS`,
:data:`MAX_STATES`) bound what a config may ask for; over them, :func:`check_targets` raises
``ValueError`` naming the entry and the cap.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

try:  # Python >= 3.11
    from re import _constants as _c
    from re import _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = [
    "MAX_STATES",
    "MAX_TARGETS",
    "MAX_TARGET_CHARS",
    "MAX_TOTAL_CHARS",
    "check_targets",
    "compile_regex",
    "compile_target",
    "target_matches",
]

#: At most this many entries in ``target_modules``.
MAX_TARGETS = 1024
#: At most this many characters in one entry (``rvclora.convert`` writes one alternation of every
#: adapted name, a few thousand characters for a whole RVC synthesizer).
MAX_TARGET_CHARS = 65536
#: At most this many characters over all entries.
MAX_TOTAL_CHARS = 262144
#: At most this many NFA states over all the patterns of a config (bounded repeats are expanded).
MAX_STATES = 50_000

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_CACHE_LIMIT = 4096  # DFA transitions kept per pattern before the cache starts over
_ALLOWED_FLAGS = _c.SRE_FLAG_UNICODE | _c.SRE_FLAG_VERBOSE | _c.SRE_FLAG_DOTALL

# state kinds
_CHAR, _SPLIT, _ASSERT, _MATCH = 0, 1, 2, 3


class _TooLarge(Exception):
    pass


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _c.CATEGORY_SPACE: str.isspace,
    _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    _c.CATEGORY_WORD: _is_word,
    _c.CATEGORY_NOT_WORD: lambda ch: not _is_word(ch),
}


def _char_class(items: list) -> Callable[[str], bool]:
    negate = bool(items) and items[0][0] is _c.NEGATE
    tests: list[Callable[[str], bool]] = []
    chars = set()
    for op, av in items[1:] if negate else items:
        if op is _c.LITERAL:
            chars.add(chr(av))
        elif op is _c.RANGE:
            lo, hi = av
            tests.append(lambda ch, lo=lo, hi=hi: lo <= ord(ch) <= hi)
        elif op is _c.CATEGORY:
            tests.append(_CATEGORIES[av])
        else:
            raise ValueError(f"the character class item {op} is not supported")

    def pred(ch: str) -> bool:
        return (ch in chars or any(t(ch) for t in tests)) != negate

    return pred


class _Pattern:
    """A compiled target regex: a Thompson NFA simulated with cached state-set transitions."""

    def __init__(self, pattern: str, budget: int = MAX_STATES) -> None:
        self.pattern = pattern
        self.budget = budget
        try:
            parsed = _sre_parse.parse(pattern)
        except RecursionError:
            raise ValueError("it nests groups too deeply") from None
        flags = parsed.state.flags
        if flags & ~_ALLOWED_FLAGS:
            raise ValueError(
                "inline flags that change what a character matches ((?i), (?a), (?L), (?m)) are not supported"
            )
        self.dotall = bool(flags & _c.SRE_FLAG_DOTALL)
        self.kind: list[int] = []
        self.arg: list = []
        self.outs: list[list[int]] = []
        self.match = self._new(_MATCH, None, [])
        try:
            self.start = self._seq(list(parsed), self.match)
        except RecursionError:
            raise ValueError("it nests groups too deeply") from None
        except _TooLarge:
            raise ValueError(
                f"it expands to more than {self.budget} states (of MAX_STATES={MAX_STATES} for all "
                "entries); use shorter alternations or smaller repeat counts"
            ) from None
        self._closures: dict = {}
        self._steps: dict = {}

    # -- construction (backwards: each piece is built knowing the state that follows it) --

    def _new(self, kind: int, arg, outs: list[int]) -> int:
        if len(self.kind) >= self.budget:
            raise _TooLarge
        self.kind.append(kind)
        self.arg.append(arg)
        self.outs.append(outs)
        return len(self.kind) - 1

    def _seq(self, items: Sequence, nxt: int) -> int:
        for item in reversed(items):
            nxt = self._item(item, nxt)
        return nxt

    def _item(self, item, nxt: int) -> int:
        op, av = item
        if op is _c.LITERAL:
            ch = chr(av)
            return self._new(_CHAR, lambda c, ch=ch: c == ch, [nxt])
        if op is _c.NOT_LITERAL:
            ch = chr(av)
            return self._new(_CHAR, lambda c, ch=ch: c != ch, [nxt])
        if op is _c.ANY:
            return self._new(_CHAR, (lambda c: True) if self.dotall else (lambda c: c != "\n"), [nxt])
        if op is _c.IN:
            return self._new(_CHAR, _char_class(list(av)), [nxt])
        if op is _c.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags & ~_ALLOWED_FLAGS or del_flags & ~_ALLOWED_FLAGS:
                raise ValueError("scoped flags that change what a character matches ((?i:...)) are not supported")
            return self._seq(list(sub), nxt)
        if op is _c.BRANCH:
            return self._new(_SPLIT, None, [self._seq(list(alt), nxt) for alt in av[1]])
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):  # greedy or lazy: the same language, and only fullmatch counts
            lo, hi, sub = av
            sub = list(sub)
            tail = nxt
            if hi == _c.MAXREPEAT:
                loop = self._new(_SPLIT, None, [-1, nxt])
                self.outs[loop][0] = self._seq(sub, loop)
                tail = loop
            else:
                for _ in range(hi - lo):
                    tail = self._new(_SPLIT, None, [self._seq(sub, tail), nxt])
            for _ in range(lo):
                tail = self._seq(sub, tail)
            return tail
        if op is _c.AT:
            return self._new(_ASSERT, av, [nxt])
        what = {
            _c.GROUPREF: "backreferences",
            _c.GROUPREF_EXISTS: "conditionals",
            _c.ASSERT: "lookahead/lookbehind",
            _c.ASSERT_NOT: "lookahead/lookbehind",
        }.get(op)
        if what is None and str(op) in ("ATOMIC_GROUP", "POSSESSIVE_REPEAT"):
            what = "atomic groups and possessive repeats"
        raise ValueError(f"{what or str(op)} cannot run in linear time and are not supported")

    # -- simulation --

    def _holds(self, at, ctx: tuple) -> bool:
        begin, end, before_final_newline, prev_word, next_word = ctx
        if at in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING, _c.AT_BEGINNING_LINE):
            return begin
        if at is _c.AT_END:
            return end or before_final_newline
        if at in (_c.AT_END_STRING, _c.AT_END_LINE):
            return end
        if at is _c.AT_BOUNDARY:
            return prev_word != next_word
        if at is _c.AT_NON_BOUNDARY:
            return prev_word == next_word and not (begin and end)  # as sre: never in an empty string
        return False

    def _closure(self, states: frozenset, ctx: tuple) -> frozenset:
        key = (states, ctx)
        hit = self._closures.get(key)
        if hit is not None:
            return hit
        seen: set[int] = set()
        out = set()
        stack = list(states)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            kind = self.kind[s]
            if kind == _SPLIT:
                stack.extend(self.outs[s])
            elif kind == _ASSERT:
                if self._holds(self.arg[s], ctx):
                    stack.append(self.outs[s][0])
            else:
                out.add(s)
        result = frozenset(out)
        if len(self._closures) >= _CACHE_LIMIT:
            self._closures.clear()
        self._closures[key] = result
        return result

    def _step(self, states: frozenset, ch: str) -> frozenset:
        key = (states, ch)
        hit = self._steps.get(key)
        if hit is not None:
            return hit
        result = frozenset(self.outs[s][0] for s in states if self.kind[s] == _CHAR and self.arg[s](ch))
        if len(self._steps) >= _CACHE_LIMIT:
            self._steps.clear()
        self._steps[key] = result
        return result

    def fullmatch(self, name: str) -> bool:
        n = len(name)
        current = frozenset((self.start,))
        for pos in range(n + 1):
            ctx = (
                pos == 0,
                pos == n,
                pos == n - 1 and name[pos] == "\n",
                pos > 0 and _is_word(name[pos - 1]),
                pos < n and _is_word(name[pos]),
            )
            closed = self._closure(current, ctx)
            if pos == n:
                return self.match in closed
            current = self._step(closed, name[pos])
            if not current:
                return False
        return False


@functools.lru_cache(maxsize=2048)
def compile_target(target: str, budget: int = MAX_STATES) -> Callable[[str], bool]:
    """A predicate ``name -> bool`` for one ``target_modules`` entry (see the module docstring).

    The predicate's ``states`` attribute is its NFA's size (0 for a plain name). Raises
    ``ValueError`` naming the entry when it is not a valid, supported pattern, is longer than
    :data:`MAX_TARGET_CHARS` or needs more than ``budget`` states.
    """
    if not isinstance(target, str) or not target:
        raise ValueError(f"target_modules entries must be non-empty strings, got {target!r}")
    if len(target) > MAX_TARGET_CHARS:
        raise ValueError(
            f"target_modules entry {target[:40]!r}... has {len(target)} characters; at most "
            f"{MAX_TARGET_CHARS} (MAX_TARGET_CHARS) are accepted"
        )
    if _PLAIN_NAME.fullmatch(target):
        want = target.split(".")

        def run(name: str) -> bool:
            have = name.split(".")
            return any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))

        run.states = 0  # type: ignore[attr-defined]
        return run
    try:
        pattern = _Pattern(target, budget)
    except re.error as e:
        raise ValueError(f"target_modules entry {target[:200]!r} is not a valid regular expression: {e}") from None
    except ValueError as e:
        raise ValueError(f"target_modules entry {target[:200]!r}: {e}") from None
    return _Compiled(pattern)


class _Compiled:
    """A compiled pattern as a predicate, with its size."""

    def __init__(self, pattern: _Pattern) -> None:
        self._pattern = pattern
        self.states = len(pattern.kind)

    def __call__(self, name: str) -> bool:
        return self._pattern.fullmatch(name)


@functools.lru_cache(maxsize=2048)
def compile_regex(pattern: str) -> Callable[[str], bool]:
    """``pattern`` as a regular expression (never as a plain name) that must match a whole name, in linear time.

    For patterns other formats apply to module names (PEFT's ``rank_pattern``); the same
    engine, refusals and per-pattern caps as :func:`compile_target`.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string, got {pattern!r}")
    if len(pattern) > MAX_TARGET_CHARS:
        raise ValueError(f"pattern {pattern[:40]!r}... has {len(pattern)} characters; at most {MAX_TARGET_CHARS}")
    try:
        return _Compiled(_Pattern(pattern))
    except re.error as e:
        raise ValueError(f"pattern {pattern[:200]!r} is not a valid regular expression: {e}") from None
    except ValueError as e:
        raise ValueError(f"pattern {pattern[:200]!r}: {e}") from None


def check_targets(targets: Sequence[str]) -> None:
    """Check every entry compiles and that the list is within the caps (``ValueError`` naming the first problem)."""
    if len(targets) > MAX_TARGETS:
        raise ValueError(f"target_modules has {len(targets)} entries; at most {MAX_TARGETS} (MAX_TARGETS) are accepted")
    total = 0
    for t in targets:
        if not isinstance(t, str) or not t:
            raise ValueError(f"target_modules entries must be non-empty strings, got {t!r}")
        total += len(t)
        if total > MAX_TOTAL_CHARS:
            raise ValueError(f"target_modules holds more than {MAX_TOTAL_CHARS} characters in all (MAX_TOTAL_CHARS)")
    budget = MAX_STATES
    for t in targets:
        budget -= compile_target(t, max(budget, 1)).states


def target_matches(target: str, name: str) -> bool:
    """Does ``target`` select the module with qualified name ``name``? (see the module docstring)"""
    return compile_target(target)(name)
