"""Applying a trained run: patch/folder prediction, tissue check, whole slides, export, explanations.

Submodules (imported lazily by the CLI so ``--help`` stays fast):

* :mod:`cmafnet.inference.predict` - :class:`~cmafnet.inference.predict.Predictor` (its ``logits_stream`` is the
  one inference loop), ``PredictOptions``, ``predict_files``
* :mod:`cmafnet.inference.tissue` - ``check_tile``, ``pixel_masks`` ("not assessable" flags)
* :mod:`cmafnet.inference.wsi` - ``predict_slide`` (OpenSlide tiling, heatmap, GeoJSON)
* :mod:`cmafnet.inference.export` - ``export_run`` / ``export_model`` (ONNX, TorchScript, parity)
* :mod:`cmafnet.inference.explain` - ``Explainer`` (CMAF attention/gate maps, Grad-CAM)
* :mod:`cmafnet.inference.io` - input discovery and per-file decoding with reasons
"""
