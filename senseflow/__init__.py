"""SenseFlow: distil SDXL, SD3.5 and FLUX.1-dev teachers into 4-step generators (DMD2 + IDA + ISG + VFM GAN)."""
__version__ = "0.1.0"
