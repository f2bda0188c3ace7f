// The app's logic in plain Kotlin: no Android API, so it also builds and tests on any JVM.
// On the machine this was written on it is compiled by tests/kotlin_host.py (Debian's kotlinc 1.3,
// junit4, Android's org.json from libandroid-json-java) -- this Gradle file itself was NEVER RUN.
plugins {
    kotlin("jvm")
}

java {
    // Android's D8 reads Java 8 bytecode from a plain JVM library.
    sourceCompatibility = JavaVersion.VERSION_1_8
    targetCompatibility = JavaVersion.VERSION_1_8
}

tasks.withType<org.jetbrains.kotlin.gradle.tasks.KotlinCompile>().configureEach {
    kotlinOptions.jvmTarget = "1.8"
}

// org.json is part of Android: compile against it, do not ship it. Android's own implementation
// (repackaged on Maven Central, as Debian's libandroid-json-java is), not json.org's: the two differ
// (e.g. key order), and the app runs on Android's.
val androidJson = "com.vaadin.external.google:android-json:0.0.20131108.vaadin1"

dependencies {
    compileOnly(androidJson)
    testImplementation(androidJson)
    testImplementation("junit:junit:4.13.2")
}
