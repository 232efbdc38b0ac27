// Anchor source for the precompiled LibTorch header target.
