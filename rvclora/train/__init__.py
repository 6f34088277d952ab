"""``rvclora train``: fine-tune a voice adapter from an RVC/Applio experiment folder, as RVC trains.

* :mod:`.config`: the folder's ``config.json``;
* :mod:`.data`: ``filelist.txt``, checked, then read as RVC's loaders read it;
* :mod:`.mel`: RVC's spectrogram and slaney mel;
* :mod:`.synthetic`: a generated dataset in RVC's layout (the demo's and the tests');
* :mod:`.loop`: :class:`Trainer`, RVC's GAN step with LoRA on the synthesizer.
"""
