"""napari-deepspot2cell: virtual single-cell expression from H&E with DeepSpot2Cell."""

__version__ = "0.1.0"
