"""The language-model side, shared by extraction and evaluation: loading a model, where its MLP is read, text windows.

Nothing is re-exported here, so importing the text modules does not import torch or transformers.
"""
