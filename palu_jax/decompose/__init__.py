"""Low-rank decomposition of k/v projections (Palu): SVD and rank allocation."""
