"""Thin napari widgets over the core (predict, genes, train) and the layer helpers they share.

Nothing is imported here, so ``widgets.layers`` can be used without pulling in
Qt widgets; import ``widgets.genes.GeneBrowser`` etc. directly.
"""
