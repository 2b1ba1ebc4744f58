"""The floor every other room stands on: errors, the typed manifest, identities, shapes, file writing.

Nothing here imports another subpackage of qwen_image_trt; everything else may import this.
"""
