"""`builder`: the maintainer's pipeline, one verb per stage.

    builder data build            corpus -> Parquet shards + manifest
    builder tokenizer train       SentencePiece BPE + tokenizer.json
    builder pretrain              pretraining loop (Accelerate)
    builder index build           retrieval passages in a static BM25F index
    builder sft-data              chat examples grounded in retrieved passages
    builder sft                   chat fine-tuning (full or LoRA)
    builder dpo                   preference tuning (DPO) on user or mined pairs
    builder eval                  bits-per-byte, grounded QA, refusals, samples
    builder models ...            versioned registry and the champion
    builder base ...              import a pretrained Hugging Face model to build on
    builder export                HF folder + ONNX (KV cache) + int8/q4 + manifest, behind parity gates
    builder gguf                  GGUF files (f32/f16/q8_0) + an Ollama Modelfile, for llama.cpp and Ollama
    builder card | site | docs    model card, the in-browser chat site, the mkdocs site
    builder release               all of the above, each stage cached by input hashes
"""

import click

from builder.base_cmd import base
from builder.card_cmd import card
from builder.data_cmd import data
from builder.docs_cmd import docs
from builder.dpo_cmd import dpo
from builder.index_cmd import index
from builder.models_cmd import models
from builder.release_cmd import release
from builder.site_cmd import site
from builder.tokenizer_cmd import tokenizer
from builder.eval_cmd import eval_
from builder.export_cmd import export
from builder.gguf_cmd import gguf
from builder.sft_cmd import sft
from builder.sft_data_cmd import sft_data
from builder.train_cmd import pretrain


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="supermix")
def main() -> None:
    """Build the corpus, train the tokenizer and the model, fine-tune it to chat, evaluate it and
    keep a versioned registry with a champion.

    \b
    The pipeline on the embedded default, smallest model:
      builder data build
      builder tokenizer train
      builder pretrain --preset tiny
      builder index build
      builder sft-data
      builder sft --preset tiny --base runs/pretrain-tiny/model.pth
      builder eval --model runs/sft-tiny/model.pth
      builder models add runs/sft-tiny/model.pth --tokenizer runs/tokenizer
    """


main.add_command(data)
main.add_command(tokenizer)
main.add_command(pretrain)
main.add_command(index)
main.add_command(sft)
main.add_command(sft_data)
main.add_command(dpo)
main.add_command(eval_)
main.add_command(models)
main.add_command(base)
main.add_command(site)
main.add_command(export)
main.add_command(gguf)
main.add_command(card)
main.add_command(docs)
main.add_command(release)

if __name__ == "__main__":
    main()
