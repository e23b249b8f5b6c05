"""Models: loading and the registry of known models (``registry``), the paged forward (``hf``) and
tokenizers (``tokenize``)."""
