"""segpipe: semantic segmentation of street scenes, from a folder of images and masks to a deployable model."""
__version__ = "0.1.0"
