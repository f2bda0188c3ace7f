// NEVER BUILT: no Android SDK on the machine this was written on. Versions are the last known good
// combination at the time of writing; adjust to what your Android Studio / Gradle offers.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "nomoat-android"
include(":core", ":app")
