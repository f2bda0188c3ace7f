// NEVER BUILT (see settings.gradle.kts). Plugin versions only; the modules apply them.
plugins {
    id("com.android.application") version "8.5.2" apply false
    kotlin("android") version "1.9.24" apply false
    kotlin("jvm") version "1.9.24" apply false
}
