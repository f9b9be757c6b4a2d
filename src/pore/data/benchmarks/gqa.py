"""GQA (testdev balanced): questions in one table, images in another, joined on the image id."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pore.data.benchmark import (
    BENCHMARKS,
    Benchmark,
    DataError,
    Sample,
    SampleError,
    decode_image,
)


@BENCHMARKS.register("gqa")
class GQA(Benchmark):
    name = "gqa"
    metric = "exact_match"
    default_columns = {"question_id": "id", "question": "question", "answer": "answer", "image_id": "imageId"}

    def __init__(
        self,
        columns: Mapping[str, str] | None = None,
        image_config: str = "testdev_balanced_images",
        image_split: str = "testdev",
        image_id_column: str = "id",
        image_column: str = "image",
        **options: Any,
    ) -> None:
        super().__init__(columns, **options)
        self.image_config, self.image_split = image_config, image_split
        self.image_id_column, self.image_value_column = image_id_column, image_column
        self.images: dict[str, Any] = {}

    def prepare(self, open_table: Callable[[str | None, str], Iterable[Mapping[str, Any]]]) -> None:
        # The testdev image table is small (398 images): keep the undecoded bytes in memory, keyed by id.
        for row in open_table(self.image_config, self.image_split):
            if self.image_id_column not in row or self.image_value_column not in row:
                raise DataError(
                    f"gqa: the image table {self.image_config!r} needs columns {self.image_id_column!r} and "
                    f"{self.image_value_column!r}; it has {sorted(row)}"
                )
            self.images[str(row[self.image_id_column])] = row[self.image_value_column]

    def question_id(self, row: Mapping[str, Any]) -> str:
        return str(self.column(row, "question_id"))

    def to_sample(self, row: Mapping[str, Any]) -> Sample:
        image_id = str(self.column(row, "image_id"))
        if image_id not in self.images:
            raise SampleError(f"image {image_id!r} is not in the image table {self.image_config!r}")
        return Sample(
            question_id=self.question_id(row),
            text=self.prompt(row),
            answers=[str(self.column(row, "answer"))],
            image=decode_image(self.images[image_id]),
            meta={"image_id": image_id},
        )
