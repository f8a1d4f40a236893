"""epbench-lateral: the layered energy-based network with lateral connections (kind ``eb-lateral``)."""
