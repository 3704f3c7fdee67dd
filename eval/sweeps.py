"""The default grids of the evaluations' sweeps and choices (``eval.knn``, ``eval.voting``,
``eval.pruning``, ``eval.triplets``), in a module of their own so that ``vismem --help`` shows them
without importing FAISS or torch."""

K_SWEEP = (1, 2, 5, 10, 20, 50, 100, 200)                      # eval-knn: the ks of one kNN sweep

KS = (1, 2, 3, 5, 10, 20, 30, 50, 100)                          # neighbours that vote
TEMPERATURES = (0.01, 0.02, 0.05, 0.07, 0.1, 0.2, 0.5, 1.0)     # softmax T
ALPHAS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)           # rank α
THRESHOLDS = (1, 2, 3, 4, 5, 7, 10, 15, 20)                     # hard pruning: wrong-label hits that remove an item
PRUNE_KS = (0, 1, 2, 5, 10, 20)                                 # soft pruning: neighbours counted (0: unpruned)
KINDS = ("noise", "blur", "contrast", "occlusion", "class")        # synthetic 2AFC triplets
