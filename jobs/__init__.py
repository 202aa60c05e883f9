"""Ready-made job specs (``*.yml``) and, with the round engine, the builder that turns a spec into an
NVFlare job folder."""
