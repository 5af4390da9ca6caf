"""The four guidance methods, each as pure tensor functions plus small per-generation state.

Every method works in eps space, per image, with no host types.
"""
