"""The offline content tools: `import`, `verify` and `ls`.

They read and write the content tree only through `minimal_registry.layout` (where things
live) and `minimal_registry.manifest` (what a manifest says), the same code the server uses.

    sources.py      what a SOURCE is: OCI layout, Docker archive, skopeo `dir:`, raw manifest,
                    or a (.gz/.zst) tar of one; fills a Pool
    archive.py      unpack a tar safely into a staging directory, hashing as it goes
    decompress.py   open plain, gzip and zstd streams
    pool.py         content found in the sources (and already in the tree), by digest
    names.py        image references: docker.io normalisation, domain trimming
    plan.py         from the pool's roots to what must be written, platforms chosen
    place.py        write blobs, manifests and tags into the tree: temp name, fsync, rename
    hashing.py      sha256 of many files at disk speed, on every core
    progress.py     a progress bar on a terminal, plain lines elsewhere
    importer.py     `import`
    verify.py       `verify`
    listing.py      `ls`
"""
