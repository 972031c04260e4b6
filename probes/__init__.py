"""Probe quality: k-NN, linear and dense probes on any feature source (torch, ONNX, service)."""
