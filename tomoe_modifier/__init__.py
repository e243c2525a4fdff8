"""ToMoE for llm-compressor: turn dense decoder MLPs into top-1 mixtures of experts.

Importing this package registers ``ToMoEModifier`` with llm-compressor's
ModifierFactory (so YAML recipes and saved ``recipe.yaml`` files can name it) and
the converted architectures with transformers' Auto classes (so
``AutoModelForCausalLM.from_pretrained`` loads converted checkpoints), and makes
the ``recipe.yaml`` that oneshot saves loadable again when it holds enum-valued
fields such as GPTQ's ``actorder`` (``tomoe_modifier.recipe_yaml``).
"""

from importlib.metadata import PackageNotFoundError, version

from llmcompressor.modifiers.factory import ModifierFactory
from transformers import AutoConfig, AutoModelForCausalLM

from tomoe_modifier.base import ToMoEModifier
from tomoe_modifier.fast import use_cpu_kernels
from tomoe_modifier.modeling_tomoe import TOMOE_ARCHITECTURES, ToMoESparseMLP
from tomoe_modifier.recipe_yaml import register_enum_representer

try:
    __version__ = version("tomoe-modifier")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"

__all__ = ["ToMoEModifier", "ToMoESparseMLP", "use_cpu_kernels", "__version__"]

ModifierFactory.register("ToMoEModifier", ToMoEModifier)
register_enum_representer()  # saved recipe.yaml files stay loadable (see module)
for _config_cls, _model_cls in TOMOE_ARCHITECTURES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)
    # write auto_map + copy modeling_tomoe.py so trust_remote_code loads it alone
    _config_cls.register_for_auto_class("AutoConfig")
    _model_cls.register_for_auto_class("AutoModelForCausalLM")
