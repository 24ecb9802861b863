"""One module per dataset, each exposing ``SPEC: dataset_spec.DatasetSpec``."""
