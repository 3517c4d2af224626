"""TensorFlow backend tests: run in their own pytest process (never with torch, triton or jax)."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
