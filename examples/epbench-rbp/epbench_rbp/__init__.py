"""Almeida-Pineda recurrent backpropagation (RBP) for epbench."""
