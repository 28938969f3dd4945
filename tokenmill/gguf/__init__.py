"""GGUF files: the header and tensor reader (``reader``), dequantization to float
(``dequant``) and the packed-matrix type handed to the layers (``quant_types``).
A leaf package: it imports nothing else of tokenmill."""
