"""luna_dist: lung-nodule models on LUNA16-format CT data, from one laptop to a GPU cluster."""

__version__ = "0.2.0"
