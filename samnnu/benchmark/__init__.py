"""samnnu against nnU-Net on the same fold, subsets and budget."""
