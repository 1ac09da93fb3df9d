"""Models we train ourselves, offline: character-level GPT-2s on Shakespeare (``gpt2``, ``chartok``,
``shakespeare``), prompt/answer tasks (``tasks``), the digits MLP (``mlp``, a family registered through
the ``modelcypher.families`` entry point like any other package's) and the demo. The package itself never
imports the zoo; the demo, the benchmarks and the tests do."""
