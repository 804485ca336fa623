"""The job protocol over Redis: key names, the job spec, the job store and the worker's side of
delivery. Nothing here imports torch or the engine: the gateway uses these modules too."""
