"""Metrics, losses and small torch helpers shared by training, validation and prediction."""
