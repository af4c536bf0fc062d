"""The string options of the estimator, written once.

Kept free of heavy imports: the command line builds its ``choices`` from
these before torch is loaded. The modules that own each option
(:mod:`skprotoad.network`, :mod:`skprotoad.clustering`) re-export them.
"""

#: ``ProtoADDetector(clustering=...)``, ``learn_prototypes(method=...)``.
CLUSTERING_METHODS = ("finch", "kmeans")
#: Where patch features sit on the image (``alignment``).
ALIGNMENTS = ("center", "paper")
#: How patch features are scaled (``normalization``).
NORMALIZATIONS = ("image", "patch")
#: What the backbone sees past the image border (``padding``).
PADDINGS = ("zeros", "reflect")
#: How an image's anomaly score is read out (``image_score``).
IMAGE_SCORES = ("projection", "cosine", "map")
#: The metric the anomaly map measures distances in (``map_metric``).
MAP_METRICS = ("whitened", "euclidean")
