"""tfds datasets as random-access sources (ArrayRecord files read without
TensorFlow), with errors that say where we looked and how to get the data."""

import tensorflow_datasets as tfds


def data_source(name, split, data_dir="", download=False):
  """`tfds.data_source(name, split)`; tfds prepares the dataset first if `download`."""
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=download,
                            builder_kwargs=dict(file_format="array_record"))
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"tfds has no dataset {name!r} (see "
                     "https://www.tensorflow.org/datasets/catalog)") from e
  except Exception as e:
    builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    if download and not builder.is_prepared():
      raise RuntimeError(f"tfds could not download and prepare {name!r} into "
                         f"{builder.data_dir} ({type(e).__name__}: {e}); prepare it where "
                         "there is network access and point task.data_dir at it") from e
    if builder.is_prepared():
      splits = sorted(builder.info.splits)
      if split.split("[")[0] not in splits:  # "train[:90%]" names a slice of "train"
        raise ValueError(f"tfds dataset {name!r} has no split {split!r}; it has {splits}") from e
      raise RuntimeError(f"tfds dataset {name!r} in {builder.data_dir} cannot be read as "
                         "ArrayRecord; prepare it with --file_format=array_record (grain "
                         "reads only random-access formats)") from e
    raise ValueError(
        f"tfds dataset {name!r} is not prepared in {builder.data_dir}. Prepare it with "
        f"`tfds build {name} --file_format=array_record"
        f"{' --data_dir=' + data_dir if data_dir else ''}` (some datasets, e.g. imagenet2012, "
        "need their files in the manual dir first), set task.download=True to let tfds "
        "fetch it, or point task.data_dir at a prepared copy.") from e
