"""ImageNet's per-channel mean and standard deviation, on pixels in [0, 1]: the normalisation every
DINOv2 model was trained and evaluated with (its own module, so evaluation code that needs the two
numbers does not import, and ship, the training augmentations)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
