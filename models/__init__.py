"""Loading Hugging Face causal LMs and patching them into fake-quantized students."""

from models.loading import load_model, load_tokenizer, model_fingerprint, read_quant_config, resolve_model, save_model
from models.patch import dequantize_model, get_quant_config, quantize_model, set_quantizers_enabled

__all__ = ["load_model", "model_fingerprint", "load_tokenizer", "save_model", "resolve_model", "read_quant_config",
           "quantize_model", "dequantize_model", "get_quant_config", "set_quantizers_enabled"]
