"""qcbdefense: purify and detect quantization-conditioned backdoors."""
__version__ = "0.1.0"
