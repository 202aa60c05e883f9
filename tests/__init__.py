"""medsilo tests: ``unit`` (seconds), ``sim`` (simulator jobs), ``deploy`` (real processes)."""
