"""Continuous WAL archiving, base backups and point-in-time restore to object storage.

The repository is a bucket and prefix (S3, or `file://` for a pilot). It is
self-describing: with the bucket and the credentials alone, a new host can list,
verify and restore. Layout under the prefix:

    repo.json                                   format, system identifier, codec
    wal/<name>                                  every file Postgres archives, stored as-is
                                                by name: segments (24 hex), timeline
                                                history (`00000002.history`), backup
                                                history (`…00000028.backup`), `.partial`
    backups/<id>/base.NNNN.tar.zst              the `pg_basebackup -Ft -D -` tar stream,
                                                cut between files into parts (each a tar
                                                of its own), compressed (and encrypted
                                                when configured); format-1 backups of
                                                earlier releases hold one `base.tar.zst`
    backups/<id>/manifest.json                  written last: a backup without one is
                                                incomplete and never used; lists the
                                                parts with their sha256 and sizes

Every stored object carries metadata: `sha256` and `size` of the original bytes (for
a backup's parts, known only once each is written, they are in the manifest instead),
`codec` (`zstd`, or `zstd+aes256gcm`), and `sysid` (the cluster's system identifier).
A WAL file counts as archived only after its object is in the repository and the
store acknowledged the bytes (Content-MD5 on S3, fsync + rename for files).
With `backup.encryption_key`, objects are sealed to their names and WAL metadata and
manifests carry MACs (see `auth`).

Modules: `walnames` (names, LSNs, timelines), `repo` (S3 and file repositories), `codec`
(zstd, optional AES-256-GCM), `auth` (subkeys, MACs), `archiver` (the agent's
upload-ahead loop and the tiny archive_command), `basebackup` (`backup now`),
`tarstream` (the tar stream, parsed as it passes), `parts` (the stream stored as parts),
`catalog` (list, continuity, verify, expire), `extract` (parts put in place at once),
`restore` (restore with a prefetching restore_command, drill), `postmaster` (the
recovery server: private, never archiving, stopped with every process), `pgcommand`
(paths in archive_command and restore_command, quoted and `%`-escaped).
"""
