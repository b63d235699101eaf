"""Preparing a model's inputs: a tokenizer trained on a corpus (`retnet tokenizer`,
`prepare.tokenizer`) and weights converted from microsoft/torchscale (`retnet convert`,
`prepare.convert`). The storage layer below does the work (`data`, `tokenizer`, `convert`,
`checkpoint`); these modules hold the commands."""
