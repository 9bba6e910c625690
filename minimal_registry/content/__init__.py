"""The offline content tools: `import`, `verify`, `ls`, `rm` and `prune`.

They read and write the content tree only through `minimal_registry.layout` (where things
live) and `minimal_registry.manifest` (what a manifest says), the same code the server uses.

    importer.py      `import`: sources -> pool -> plan -> place
    sources.py       what a SOURCE is (OCI layout, docker-save, skopeo dir:, raw manifest,
                     or a tar of one) and which reader takes it
    ocilayout.py     read an OCI image layout (index.json, blobs/sha256/<hex>)
    treesource.py    read a content tree in our layout (a directory, or registry.tar.gz)
    dockerarchive.py turn a docker-save manifest.json into schema2 manifests
    archive.py       unpack a tar safely into a staging directory, hashing as it goes
    decompress.py    plain, gzip, bzip2, xz and zstd streams
    files.py         a source's files by name, on disk or staged; only regular files opened
    entry.py         Entry: one regular file a source offers (path, size, digest if known)
    jsonread.py      JSON documents of a source, bounded in size and nesting
    intact.py        which blobs the tree already holds with the right bytes
    pool.py          content the sources hold, by digest, and the images they name
    names.py         image references: docker.io rules, domain trimming
    platforms.py     os/arch[/variant] compared as containerd does
    plan.py          every decision before any write: names, platforms, missing content
    place.py         write blobs, manifests, tags and `blobs` links, in a safe order
    atomic.py        temp name, fsync, rename
    verify.py        `verify`
    listing.py       `ls`
    remove.py        `rm`: tags and manifests by reference, k3s-images.txt lists
    prune.py         `prune`: mark from the tags, sweep what nothing reaches
    lock.py          one writer at a time (import, rm, prune): flock on the tree
    containment.py   where rm and prune may delete (no symlinked directory); reads: treesafety
    treewalk.py      a tree's repositories and blobs, for verify and ls
    hashing.py       sha256 of many files at disk speed, on every core
    progress.py      a bar on a terminal, plain lines elsewhere
    formatting.py    sizes, durations, short media type names
"""
