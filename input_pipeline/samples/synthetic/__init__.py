"""One fake-data writer per dataset (``write(out, rng, num) -> ids``) and their shared helpers;
``input_pipeline.samples.generate`` is the registry and command line."""
