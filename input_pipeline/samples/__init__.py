"""Small synthetic datasets in the published on-disk layouts (see ``generate``)."""
