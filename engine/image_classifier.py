"""The logged model as a user calls it: images in, class names and probabilities out (an MLflow pyfunc).

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    model.predict({"image": [open("seven.png", "rb").read(), uint8_hwc_array]})
    #   class  probability  probabilities
    # 0     7     0.998...  {'0': 1.2e-06, ..., '7': 0.998, ...}

MLflow logs this file itself ("models from code", no pickled objects): it imports only MLflow, NumPy, pandas,
Pillow and torch, so it loads wherever the model is served. The trained network is the model's artifact
``pytorch_model`` (an ``mlflow.pytorch`` model in torch.export's pt2 format, loadable on its own as an
``nn.Module``); how a picture becomes the network's input is the model's config (``PREPROCESSING_KEYS``,
recorded in its MLmodel file), written by the training from the evaluation transforms it used.
"""

import base64
import io

import mlflow
import numpy as np
import pandas as pd

INPUT_COLUMN = "image"
NETWORK_ARTIFACT = "pytorch_model"
# class_names: in label order; channels: 1 (grey, PIL mode "L") or 3 (RGB); height, width: the network's input
# size; mean, std: per channel, in [0, 1] units: the input is (pixel / 255 - mean) / std.
PREPROCESSING_KEYS = ("class_names", "channels", "height", "width", "mean", "std")
PIL_MODES = {1: "L", 3: "RGB"}


def signature():
    """Input: one column ``image`` of PNG/JPEG file bytes (base64 in a served JSON request) or uint8 arrays;
    output: the most likely class name, its probability, and every class's probability."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    return ModelSignature(inputs=Schema([ColSpec(DataType.binary, INPUT_COLUMN)]),
                          outputs=Schema([ColSpec(DataType.string, "class"), ColSpec(DataType.double, "probability"),
                                          ColSpec(Map(DataType.double), "probabilities")]))


def to_picture(image):
    """A PIL image from file bytes (PNG, JPEG, ...), the same as base64 text (a JSON request's "inputs"), or a
    uint8 array of shape HxW, HxWx1, HxWx3 or HxWx4."""
    from PIL import Image, ImageOps

    if isinstance(image, str):
        image = base64.b64decode(image)
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as picture:
            return ImageOps.exif_transpose(picture)  # a phone's JPEG as it is shown, not as it is stored
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"an image must be file bytes (PNG, JPEG, ...) or a uint8 array of shape HxW or HxWxC "
                         f"(C = 1, 3 or 4), got {type(image).__name__} {array.dtype} {array.shape}")
    return Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array)


def network_input(image, preprocessing: dict) -> np.ndarray:
    """One image as the network's input (float32, C x height x width), as the training's evaluation saw it:
    converted to grey or RGB, resized (bilinear), scaled to [0, 1] and normalized."""
    from PIL import Image

    picture = to_picture(image).convert(PIL_MODES[preprocessing["channels"]])
    picture = picture.resize((preprocessing["width"], preprocessing["height"]), Image.Resampling.BILINEAR)
    pixels = np.asarray(picture, dtype=np.float32).reshape(picture.height, picture.width, -1) / 255.0
    mean, std = (np.asarray(preprocessing[key], dtype=np.float32) for key in ("mean", "std"))
    return ((pixels - mean) / std).transpose(2, 0, 1)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import mlflow.pytorch

        self.preprocessing = {key: context.model_config[key] for key in PREPROCESSING_KEYS}
        self.network = mlflow.pytorch.load_model(context.artifacts[NETWORK_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        images = model_input[INPUT_COLUMN]
        batch = torch.from_numpy(np.stack([network_input(image, self.preprocessing) for image in images]))
        with torch.no_grad():
            probabilities = torch.softmax(self.network(batch).float(), dim=1).numpy()
        names = self.preprocessing["class_names"]
        best = probabilities.argmax(axis=1)
        return pd.DataFrame({
            "class": [names[index] for index in best],
            "probability": probabilities[np.arange(len(best)), best].astype(float),
            "probabilities": [dict(zip(names, row.astype(float).tolist(), strict=True)) for row in probabilities],
        })


mlflow.models.set_model(ImageClassifier())
