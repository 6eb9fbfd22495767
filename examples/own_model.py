import keras
from rat_tf import attacks, data, evaluation, export, trainers

# Real MNIST from $RAT_DATA_DIR, as float32 images in [0, 1] and integer labels.
x, y = data.load_arrays("mnist", "train")
x_test, y_test = data.load_arrays("mnist", "test")
x, y, x_test, y_test = x[:4000], y[:4000], x_test[:1000], y_test[:1000]

# Your own classifier, trained as usual (it may end in a softmax or return logits).
model = keras.Sequential([
    keras.Input((28, 28, 1)),
    keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
    keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(),
    keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(x, y, epochs=2, batch_size=64, verbose=2)
print("FGSM 0.2 accuracy before RAT:", evaluation.adversarial_accuracy(model, x_test, y_test, 0.2))

# One targeted universal perturbation per class, searched on 1,000 images ...
V, stats = attacks.targeted_universal(model, x[:1000], y[:1000], eps=0.3, max_passes=3)
# ... and RAT: fine-tune on those images plus their perturbed copies, with their true labels.
rat = trainers.RATModel(model, V, eps=0.3)
rat.compile(optimizer=keras.optimizers.Adam(5e-4))
rat.fit(x[:1000], y[:1000], epochs=5, batch_size=50, verbose=2,
        validation_data=(x_test, y_test),
        callbacks=[keras.callbacks.ModelCheckpoint("rat.keras", monitor="val_accuracy",
                                                   save_best_only=True)])

rat = keras.models.load_model("rat.keras")  # the trainer: its classifier, V and optimizer
print("FGSM 0.2 accuracy after RAT:", evaluation.adversarial_accuracy(rat, x_test, y_test, 0.2))
export.export_saved_model(rat, "rat_savedmodel", overwrite=True)  # serves without rat_tf
