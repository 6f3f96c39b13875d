"""The smallest SD-shaped UNet the tests build (UNetConfig fields): two levels, one cross-
attention level each way, so down/up/mid blocks, attention and conv paths all appear."""

TINY_UNET = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    cross_attention_dim=16,
    norm_num_groups=8,
)
