"""OFA configuration: ``config.json`` (``OFAConfig``) and ``generation_config.json`` (fairseq's caption
search settings, see ``generation_ofa.py`` for what each knob does).

Self-contained (imports only transformers and ``settings_ofa.py``): ofaconv copies this file into
every converted folder so that ``trust_remote_code=True`` works where ofaconv is not installed.
Field names follow the existing OFA transformers ports, so their ``config.json`` files load here
unchanged.
"""

from transformers import GenerationConfig, PretrainedConfig

from .settings_ofa import generation_fields

RESNET_LAYERS = {
    # OFA names every trunk after torchvision but builds Bottleneck blocks for all of them,
    # and keeps only layer1..layer3.
    "resnet18": [2, 2, 2],
    "resnet34": [3, 4, 6],
    "resnet50": [3, 4, 6],
    "resnet101": [3, 4, 23],
    "resnet152": [3, 8, 36],
}


class OFAConfig(PretrainedConfig):
    model_type = "ofa"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_attention_heads": "encoder_attention_heads", "hidden_size": "d_model"}

    def __init__(
        self,
        vocab_size=59457,
        max_position_embeddings=1024,
        d_model=512,
        encoder_layers=4,
        encoder_ffn_dim=2048,
        encoder_attention_heads=8,
        decoder_layers=4,
        decoder_ffn_dim=2048,
        decoder_attention_heads=8,
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_drop_path_rate=0.0,
        decoder_drop_path_rate=0.0,
        resnet_drop_path_rate=0.0,
        init_std=0.02,
        scale_embedding=False,
        layernorm_embedding=True,
        patch_layernorm_embedding=True,
        code_layernorm_embedding=True,
        encoder_normalize_before=True,
        decoder_normalize_before=True,
        normformer=True,
        resnet_type="resnet101",
        resnet_layers=None,
        token_bucket_size=256,
        image_bucket_size=42,
        add_type_embedding=True,
        share_decoder_input_output_embed=True,
        attn_scale_factor=2.0,
        code_image_size=128,
        entangle_position_embedding=False,
        disable_entangle=True,
        interpolate_position=False,
        orig_patch_image_size=256,
        patch_image_size=256,
        use_cache=True,
        is_encoder_decoder=True,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.d_model = d_model
        self.encoder_layers = encoder_layers
        self.encoder_ffn_dim = encoder_ffn_dim
        self.encoder_attention_heads = encoder_attention_heads
        self.decoder_layers = decoder_layers
        self.decoder_ffn_dim = decoder_ffn_dim
        self.decoder_attention_heads = decoder_attention_heads
        self.activation_function = activation_function
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.encoder_drop_path_rate = encoder_drop_path_rate
        self.decoder_drop_path_rate = decoder_drop_path_rate
        self.resnet_drop_path_rate = resnet_drop_path_rate
        self.init_std = init_std
        self.scale_embedding = scale_embedding
        self.layernorm_embedding = layernorm_embedding
        self.patch_layernorm_embedding = patch_layernorm_embedding
        self.code_layernorm_embedding = code_layernorm_embedding
        self.encoder_normalize_before = encoder_normalize_before
        self.decoder_normalize_before = decoder_normalize_before
        self.normformer = normformer
        self.resnet_type = resnet_type
        if resnet_layers is None:
            if resnet_type not in RESNET_LAYERS:
                raise ValueError(f"unknown resnet_type {resnet_type!r}; give resnet_layers explicitly")
            resnet_layers = RESNET_LAYERS[resnet_type]
        self.resnet_layers = list(resnet_layers)
        self.token_bucket_size = token_bucket_size
        self.image_bucket_size = image_bucket_size
        self.add_type_embedding = add_type_embedding
        self.share_decoder_input_output_embed = share_decoder_input_output_embed
        self.attn_scale_factor = attn_scale_factor
        self.code_image_size = code_image_size
        self.entangle_position_embedding = entangle_position_embedding
        # fairseq adds target positions to decoder token embeddings unless this is True.
        self.disable_entangle = disable_entangle
        self.interpolate_position = interpolate_position
        self.orig_patch_image_size = orig_patch_image_size
        self.patch_image_size = patch_image_size
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
            is_encoder_decoder=is_encoder_decoder,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


# ---------------------------------------------------------------------------------------------
# generation_config.json
# ---------------------------------------------------------------------------------------------


def build_generation_config(settings: dict, model_config=None) -> GenerationConfig:
    """The ``generation_config.json`` of a converted folder, from a family's generation settings
    (see ``settings_ofa.generation_fields``)."""
    hf, fairseq = generation_fields(settings, model_config)
    config = GenerationConfig(**hf)
    for key, value in fairseq.items():
        setattr(config, key, value)
    return config
