
BEGIN;
CREATE EXTENSION IF NOT EXISTS "uuid-ossp";
CREATE EXTENSION IF NOT EXISTS unaccent;
CREATE EXTENSION IF NOT EXISTS cube;
CREATE EXTENSION IF NOT EXISTS earthdistance;
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE FUNCTION f_unaccent(text) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
  RETURN unaccent('unaccent', $1);

-- Immich's schema-qualified copy of earthdistance's ll_to_earth.
CREATE FUNCTION ll_to_earth_public(latitude double precision, longitude double precision)
  RETURNS public.earth PARALLEL SAFE IMMUTABLE STRICT LANGUAGE SQL AS $$
    SELECT public.cube(public.cube(public.cube(public.earth()*cos(radians(latitude))*cos(radians(longitude))),public.earth()*cos(radians(latitude))*sin(radians(longitude))),public.earth()*sin(radians(latitude)))::public.earth
$$;

CREATE FUNCTION updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  new."updatedAt" = now();
  RETURN new;
END;
$$;

CREATE TYPE asset_status_enum AS ENUM ('active', 'trashed', 'deleted');
CREATE TYPE asset_visibility_enum AS ENUM ('archive', 'timeline', 'hidden', 'locked');

CREATE TABLE "user" (
  "id" uuid NOT NULL DEFAULT uuid_generate_v4(),
  "email" character varying NOT NULL,
  "name" character varying NOT NULL DEFAULT '',
  "isAdmin" boolean NOT NULL DEFAULT false,
  "password" character varying NOT NULL DEFAULT '',
  "storageLabel" character varying,
  "profileImagePath" character varying NOT NULL DEFAULT '',
  "quotaSizeInBytes" bigint,
  "quotaUsageInBytes" bigint NOT NULL DEFAULT 0,
  "createdAt" timestamp with time zone NOT NULL DEFAULT now(),
  "updatedAt" timestamp with time zone NOT NULL DEFAULT now(),
  "deletedAt" timestamp with time zone,
  CONSTRAINT "user_pkey" PRIMARY KEY ("id"),
  CONSTRAINT "user_email_uq" UNIQUE ("email"),
  CONSTRAINT "user_storageLabel_uq" UNIQUE ("storageLabel")
);

CREATE TABLE "asset" (
  "id" uuid NOT NULL DEFAULT uuid_generate_v4(),
  "deviceAssetId" character varying NOT NULL,
  "ownerId" uuid NOT NULL,
  "deviceId" character varying NOT NULL,
  "type" character varying NOT NULL,
  "originalPath" character varying NOT NULL,
  "originalFileName" character varying NOT NULL,
  "fileCreatedAt" timestamp with time zone NOT NULL,
  "fileModifiedAt" timestamp with time zone NOT NULL,
  "localDateTime" timestamp with time zone NOT NULL,
  "createdAt" timestamp with time zone NOT NULL DEFAULT now(),
  "updatedAt" timestamp with time zone NOT NULL DEFAULT now(),
  "deletedAt" timestamp with time zone,
  "isFavorite" boolean NOT NULL DEFAULT false,
  "duration" character varying,
  "checksum" bytea NOT NULL,
  "thumbhash" bytea,
  "livePhotoVideoId" uuid,
  "status" asset_status_enum NOT NULL DEFAULT 'active',
  "visibility" asset_visibility_enum NOT NULL DEFAULT 'timeline',
  CONSTRAINT "asset_pkey" PRIMARY KEY ("id"),
  CONSTRAINT "asset_ownerId_fkey" FOREIGN KEY ("ownerId") REFERENCES "user" ("id") ON UPDATE CASCADE ON DELETE CASCADE,
  CONSTRAINT "asset_livePhotoVideoId_fkey" FOREIGN KEY ("livePhotoVideoId") REFERENCES "asset" ("id") ON UPDATE CASCADE ON DELETE SET NULL
);
CREATE UNIQUE INDEX "UQ_asset_owner_checksum" ON "asset" ("ownerId", "checksum");
CREATE INDEX "asset_originalFileName_trigram_idx" ON "asset" USING gin (f_unaccent("originalFileName") gin_trgm_ops);
CREATE INDEX "asset_localDateTime_month_idx" ON "asset" ((date_trunc('MONTH'::text, ("localDateTime" AT TIME ZONE 'UTC'::text)) AT TIME ZONE 'UTC'::text));

CREATE TABLE "asset_exif" (
  "assetId" uuid NOT NULL,
  "make" character varying,
  "model" character varying,
  "exifImageWidth" integer,
  "exifImageHeight" integer,
  "fileSizeInByte" bigint,
  "orientation" character varying,
  "dateTimeOriginal" timestamp with time zone,
  "latitude" double precision,
  "longitude" double precision,
  "city" character varying,
  "country" character varying,
  "description" text NOT NULL DEFAULT '',
  "fNumber" double precision,
  "iso" integer,
  "tags" character varying[],
  "updatedAt" timestamp with time zone NOT NULL DEFAULT clock_timestamp(),
  CONSTRAINT "asset_exif_pkey" PRIMARY KEY ("assetId"),
  CONSTRAINT "asset_exif_assetId_fkey" FOREIGN KEY ("assetId") REFERENCES "asset" ("id") ON UPDATE CASCADE ON DELETE CASCADE
);
CREATE INDEX "IDX_asset_exif_gist_earthcoord" ON "asset_exif" USING gist (ll_to_earth_public(latitude, longitude));
CREATE INDEX "asset_exif_city_idx" ON "asset_exif" ("city");
CREATE TRIGGER "asset_exif_updatedAt" BEFORE UPDATE ON "asset_exif" FOR EACH ROW EXECUTE FUNCTION updated_at();

CREATE TABLE "album" (
  "id" uuid NOT NULL DEFAULT uuid_generate_v4(),
  "ownerId" uuid NOT NULL,
  "albumName" character varying NOT NULL DEFAULT 'Untitled Album',
  "description" text NOT NULL DEFAULT '',
  "albumThumbnailAssetId" uuid,
  "isActivityEnabled" boolean NOT NULL DEFAULT true,
  "order" character varying NOT NULL DEFAULT 'desc',
  "createdAt" timestamp with time zone NOT NULL DEFAULT now(),
  "updatedAt" timestamp with time zone NOT NULL DEFAULT now(),
  CONSTRAINT "album_pkey" PRIMARY KEY ("id"),
  CONSTRAINT "album_ownerId_fkey" FOREIGN KEY ("ownerId") REFERENCES "user" ("id") ON UPDATE CASCADE ON DELETE CASCADE,
  CONSTRAINT "album_albumThumbnailAssetId_fkey" FOREIGN KEY ("albumThumbnailAssetId") REFERENCES "asset" ("id") ON UPDATE CASCADE ON DELETE SET NULL
);

CREATE TABLE "album_asset" (
  "albumId" uuid NOT NULL,
  "assetId" uuid NOT NULL,
  "createdAt" timestamp with time zone NOT NULL DEFAULT now(),
  CONSTRAINT "album_asset_pkey" PRIMARY KEY ("albumId", "assetId"),
  CONSTRAINT "album_asset_albumId_fkey" FOREIGN KEY ("albumId") REFERENCES "album" ("id") ON UPDATE CASCADE ON DELETE CASCADE,
  CONSTRAINT "album_asset_assetId_fkey" FOREIGN KEY ("assetId") REFERENCES "asset" ("id") ON UPDATE CASCADE ON DELETE CASCADE
);

CREATE TABLE "kysely_migrations" (
  "name" character varying(255) NOT NULL PRIMARY KEY,
  "timestamp" character varying(255) NOT NULL
);
CREATE TABLE "kysely_migrations_lock" (
  "id" character varying(255) NOT NULL PRIMARY KEY,
  "is_locked" integer NOT NULL DEFAULT 0
);
CREATE TABLE "system_metadata" (
  "key" character varying NOT NULL PRIMARY KEY,
  "value" jsonb NOT NULL
);
CREATE TABLE "version_history" (
  "id" uuid NOT NULL DEFAULT uuid_generate_v4() PRIMARY KEY,
  "createdAt" timestamp with time zone NOT NULL DEFAULT now(),
  "version" character varying NOT NULL
);

-- Immich's id is a plain integer; an identity here puts a sequence in the dump.
CREATE TABLE "geodata_places" (
  "id" integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  "name" character varying(200) NOT NULL,
  "longitude" double precision NOT NULL,
  "latitude" double precision NOT NULL,
  "countryCode" character(2) NOT NULL,
  "admin1Name" character varying(20),
  "modificationDate" date NOT NULL
);
-- As Immich created it before ll_to_earth_public: earthdistance's ll_to_earth names cube and
-- earth without a schema, so replaying a dump (which empties search_path) fails on this index
-- with `type "earth" does not exist` unless the documented sed fix is applied.
CREATE INDEX "IDX_geodata_gist_earthcoord" ON "geodata_places" USING gist (ll_to_earth(latitude, longitude));
CREATE INDEX "idx_geodata_places_name" ON "geodata_places" USING gin (f_unaccent("name") gin_trgm_ops);
COMMIT;
