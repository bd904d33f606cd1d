"""Registration models, built by name: ``build_model("mambamorph")``."""

from mambamorph.models.registry import (RegistrationOutput, build_model, count_parameters,
                                        list_models, predict, register_model)

__all__ = ["RegistrationOutput", "build_model", "count_parameters", "list_models", "predict", "register_model"]
