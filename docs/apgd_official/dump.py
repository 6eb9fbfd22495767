"""Dump a Keras tiny_cnn / mnist_cnn's weights, the first N MNIST test images and their Keras logits."""
import sys
import numpy as np
import keras
from rat_tf import data, models
path, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = keras.models.load_model(path)
x, y = data.load_arrays("mnist", "test")  # from $RAT_DATA_DIR
x, y = x[:n], y[:n]
w = {}
for layer in model.layers:
    for v in layer.weights:
        w[f"{layer.name}/{v.name}"] = np.asarray(v)
fn = models.as_model_fn(model)
logits = np.asarray(fn(x))
print({k: v.shape for k, v in w.items()}, (logits.argmax(1) == y).mean())
np.savez(out, x=x, y=y, logits=logits, **w)
