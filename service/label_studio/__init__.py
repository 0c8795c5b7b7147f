"""Label Studio ML backend: the protocol's formats and the logic behind ``/label-studio``.

One module per concept: ``config`` (the label config: which tags the results refer to), ``rle``
(Label Studio's brush mask encoding), ``results`` (result items), ``fetch`` (task images, from the
Label Studio host only), ``protocol`` (request bodies and thresholds), ``projects`` (what ``/setup``
told us), ``tasks`` (task data and the annotator's region -> what to explain), ``predictor`` (the
budgeted loop: tasks -> queued jobs -> predictions), ``backend`` (the process-wide parts: project
store, download limit, shutdown; the routes' dependency), ``errors``. The HTTP routes are in
``service.routers.label_studio``.
"""
