-- The castore's directories, the Nix front's path infos, tenants' grants and
-- the result cache: what the embedded redb files hold on one host.
-- Values are the same encodings the redb backends store (prost messages).
CREATE TABLE directories (
    digest bytea PRIMARY KEY CHECK (length(digest) = 32),
    encoded bytea NOT NULL
);
CREATE TABLE path_infos (
    digest bytea PRIMARY KEY CHECK (length(digest) = 20),
    encoded bytea NOT NULL
);
CREATE TABLE grants (
    tenant text NOT NULL,
    kind smallint NOT NULL,
    digest bytea NOT NULL CHECK (length(digest) = 32),
    PRIMARY KEY (tenant, kind, digest)
);
CREATE TABLE results (
    key bytea PRIMARY KEY,
    recorded bytea NOT NULL
);
