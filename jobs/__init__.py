"""Ready-made job specs (``*.yml``), the builder that turns a spec into a standard NVFlare job folder
(:mod:`.builder`) and the simulator runner behind ``medsilo sim`` (:mod:`.simulate`)."""
