"""Entry file of a packaged backbone (MLflow "models from code"): names the model class."""

import mlflow.models

from trainer.models.packaging import BackbonePyfunc

mlflow.models.set_model(BackbonePyfunc())
